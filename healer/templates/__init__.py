"""Chat templates: registry, rendering, detection, assistant masks, dataset formats."""
