"""atm.export"""
