"""CosyVoice2 text-to-speech as a modelhost daemon: see engine.py and README.md."""
