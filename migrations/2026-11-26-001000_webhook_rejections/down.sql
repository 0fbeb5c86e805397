DROP TABLE webhook_rejections;
