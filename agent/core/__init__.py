"""Pure core: specs, plans, selectors, desired state and decisions. No I/O library is imported here."""
