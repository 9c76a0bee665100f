"""The host role: model import, MetaSchedule tuning through the farm, evaluation and reports."""
