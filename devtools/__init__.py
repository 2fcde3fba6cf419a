"""Developer tools that run from the checkout (not shipped in the image or the wheel)."""
