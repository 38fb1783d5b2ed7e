-- One database per component that keeps data, as each owns its data (the gateway keeps none).
CREATE DATABASE users;
CREATE DATABASE contracts;
CREATE DATABASE photos;
-- The delivery of events to functions: subscriptions, cursors, the queue, dead letters.
CREATE DATABASE events;
