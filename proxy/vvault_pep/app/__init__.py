"""Putting it together: the request pipeline, the runtime that builds the services once, the
admin API, the command line and ``explain``."""
