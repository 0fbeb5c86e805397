DROP TABLE webhook_events;
DROP TABLE webhook_deliveries;
DROP TABLE headshots;
DROP TABLE profiles;
