"""The engine: timetable, dispatch, admission, queues, the run journal, outcomes, clocks, simulation."""
