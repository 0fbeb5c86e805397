DROP TABLE send_rate_slots;
DROP TABLE campaign_chunks;
DROP TABLE campaign_recipients;
DROP TABLE campaigns;
