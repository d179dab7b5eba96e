"""duet-vlm."""
