"""Icons, style sheets and desktop files shipped with Covey."""
