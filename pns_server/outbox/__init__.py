"""The transactional outbox: deliveries queued with their approval, sent by the dispatcher."""
