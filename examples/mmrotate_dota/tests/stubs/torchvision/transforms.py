"""Empty: imported by MMRotate's H2RBox-v2 module, never used by the smoke test."""
