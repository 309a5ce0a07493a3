"""MLflow helpers: tracking store, run naming, (later) the pyfunc model and promotion rules."""
