"""The module an installed Covey starts: Briefcase's launcher runs ``python -m covey``.

It exists only in installed builds (installers/build.py ships it; a source checkout runs
``app.cli`` directly). See ``covey.__main__``.
"""
