"""The SMTP front end: a client's transaction becomes a pipeline call, its result a reply."""
