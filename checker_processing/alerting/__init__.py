"""Alerting: who hears about an incident, once when it opens and once when it closes.

`config` reads the channels, rules, maintenance windows and flapping settings (ALERTING_CONFIG,
TOML); the migrations' trigger writes an event to `alert_events` in the same transaction as
every incident that opens or closes; `outbox` turns events into notifications (one per channel,
with a stable id) and claims due ones; `rate` keeps each channel to its `max_per_minute` and
folds the rest into a summary; `sender` delivers them through a channel (`webhook`, `slack`,
`mail`, `alertmanager`) with the retries of `delivery`; `message` is what they say;
`commands` backs `checker-processing alerts test` and `alerts list`.
"""
