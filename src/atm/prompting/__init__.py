"""atm.prompting"""
