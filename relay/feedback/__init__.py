"""What comes back: bounce, ARF and mailto parsing and the reason table, and recording it."""
