"""The service: the ZeroMQ server, the job queue and the job runners."""
