"""TalkingGaussian talking heads (Fictionarry/TalkingGaussian@9bd34f7): see engine.py and README.md."""
