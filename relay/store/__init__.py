"""The only package that speaks to Redis: the client, the embedded server, errors mapped once."""
