"""Efficient Deep Learning Systems: the course library."""
