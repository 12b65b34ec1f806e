"""The milter front end: the relay's pipeline inside Postfix or Sendmail."""
