"""The tuning engine: plan and run a job (MetaSchedule through the farm's builder and runner), its job
directory, warm start, progress, and the evaluation of the tuned model."""
