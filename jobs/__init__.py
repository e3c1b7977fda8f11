"""The domain shared by the API and the worker: settings, database, tables, the job state machine."""
