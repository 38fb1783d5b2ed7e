-- One database per service, as each service owns its data.
CREATE DATABASE users;
CREATE DATABASE contracts;
CREATE DATABASE photos;
