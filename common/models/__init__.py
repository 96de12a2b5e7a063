"""Small reference models shared across weeks, each in one file that reads top to bottom."""
