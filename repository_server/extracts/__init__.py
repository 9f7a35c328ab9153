"""Extracts: full (weekly) and delta (daily) tar files of everything lodged, in a documented,
versioned format (`format`), streamed from the store with bounded memory and published
atomically (`writer`), on a schedule run by one process in the cluster (`scheduler`)."""
