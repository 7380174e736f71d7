"""`migctl simulate`: replay a job trace through the controller's own domain code
(scheduler, transitions, effective states) on a virtual clock, under several pool
policies, and compare them with an oracle lower bound.

Pure: imports the domain and the standard library only (no Redis, Celery, gRPC or
cloud client), so it runs anywhere in a second or two per policy-day.
"""
