"""Rendering: volume and surface compositing, ray marchers, the occupancy grid."""
