"""Policy and the pipeline (check, modify, sign, deliver), the upstream, the retry queue, events."""
