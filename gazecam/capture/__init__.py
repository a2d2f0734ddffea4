"""Capture: source items in; matched frames, fixations, keyframes and crops out."""
