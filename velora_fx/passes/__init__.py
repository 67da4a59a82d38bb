"""Graph passes over AOTAutograd joint graphs (see README.md in this folder for invariants)."""
