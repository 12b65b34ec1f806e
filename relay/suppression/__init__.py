"""The suppression list: entries, scopes and expiry over the store, import/export, daily counts."""
