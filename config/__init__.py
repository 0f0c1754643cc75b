"""Configuration files shipped with modelhost (the embedded default lives here)."""
