"""``gazecam bench``: latency per stage over a replayed recording, and its report."""
