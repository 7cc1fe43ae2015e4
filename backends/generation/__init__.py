"""What shapes one generation besides the model: sampling maths, context size, grammars."""
