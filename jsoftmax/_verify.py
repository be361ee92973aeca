def verify(): pass
