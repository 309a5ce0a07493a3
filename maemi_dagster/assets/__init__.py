"""Assets grouped by stage: data, vision, teacher, model, evaluation, registry."""
