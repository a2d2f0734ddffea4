"""Tests of the stop-and-ask service (gazecam.server) and the looped source it serves."""
