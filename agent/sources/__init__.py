"""Sources that can fill the cache. Each plans (resolve) then fetches into a store ``Fill``."""
