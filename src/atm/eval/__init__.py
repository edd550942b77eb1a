"""atm.eval"""
