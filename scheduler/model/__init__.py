"""The model: templates, objects and their XML, BACKUP_CONFIG rules, SCHED_ACTION maths. Pure: no I/O."""
