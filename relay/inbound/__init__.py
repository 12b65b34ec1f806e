"""The inbound listener (SMTP/LMTP) front end for bounces, complaints and mailto requests."""
