"""The assistant: task cards, step tracking, visual memory, answers grounded in facts."""
