"""ESP webhook events (SES via SNS, SendGrid, Mailgun, Postmark) read into one meaning.

``verify`` checks that a request comes from the provider, ``events`` reads its payload
into ``EspEvent`` values, and ``intake`` applies them to the suppression list through
the same ``Feedback`` as bounces and ARF reports.
"""
