"""vscan: being written (issue #24); this module registers the method once it is."""
