"""Speech recognition daemons: pocketsphinx (offline, the default) and faster-whisper.

See README.md beside this file for the operations and the options.
"""
