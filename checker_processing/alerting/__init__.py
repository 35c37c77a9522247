"""Alerting: who hears about an incident, once when it opens and once when it closes.

`config` reads the channels and rules file (ALERTING_CONFIG); the migration's trigger writes
an event to `alert_events` in the same transaction as every incident that opens or closes;
`outbox` turns events into notifications (one per channel, with a stable id) and claims due
ones; `sender` delivers them through a channel (`webhook`, `slack`) with retries.
"""
