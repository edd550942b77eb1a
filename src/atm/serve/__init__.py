"""atm.serve"""
