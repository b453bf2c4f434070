// Placeholder translation unit; the forest engine lands here (issue #2).
