"""Names and clinical codes the synthetic generator draws from.

Kept apart from ``tools.synthetic`` because they are data, not logic: a
reader looking for how a bundle is built should not scroll past them, and
whoever extends the vocabulary touches only this file. Codes are real
(LOINC, SNOMED CT, RxNorm, CVX, UCUM, the Dutch RoleCodeNL); every name,
place and organisation is made up.
"""

# fmt: off
#: kind, name, city, street, postcode, RoleCodeNL code and display.
ORGANISATIONS = (
    ("hospital", "Ziekenhuis Amstelzicht", "Amsterdam", "Zichtlaan 100", "1066 BC",
     "V4", "Ziekenhuis"),
    ("gp", "Huisartsenpraktijk De Linde", "Amstelveen", "Lindenhof 7", "1181 KL",
     "Z3", "Huisartspraktijk"),
    ("pharmacy", "Apotheek Het Anker", "Amstelveen", "Ankerplein 2", "1182 AA",
     "J8", "Openbare apotheek"),
    ("nursing-home", "Zorgcentrum De Wilgenhof", "Ouder-Amstel", "Wilgenlaan 31", "1191 GN",
     "R5", "Verpleeghuis"),
    ("hospital", "Medisch Centrum Zaanoever", "Zaandam", "Oeverweg 12", "1502 DV",
     "V4", "Ziekenhuis"),
)
GIVEN = {
    "female": ("Sanne", "Anouk", "Fleur", "Daniëlle", "Zoë", "Emma", "Julia", "Fatima", "Ingrid",
               "Marieke", "Lotte", "Wilhelmina"),
    "male": ("Daan", "Bram", "Sem", "Jeroen", "Pieter", "Mohammed", "Thijs", "Sjoerd", "Kees",
             "Willem", "Joris", "Ruben"),
}
FAMILY = (
    ("de", "Vries"), ("", "Jansen"), ("van den", "Berg"), ("van", "Dijk"), ("", "Bakker"),
    ("", "Visser"), ("", "Smit"), ("", "Meijer"), ("de", "Boer"), ("", "Mulder"), ("de", "Groot"),
    ("", "Bos"), ("van der", "Meer"), ("", "Dijkstra"), ("", "Y\u0131lmaz"), ("", "El Amrani"),
    ("van", "Leeuwen"), ("", "Brouwer"), ("de", "Wit"), ("", "Hendriks"),
)
STREETS = ("Kerkstraat", "Dorpsstraat", "Molenweg", "Schoolstraat", "Stationsweg", "Julianalaan",
            "Beatrixstraat", "Prinses Irenestraat", "Populierenlaan")
CITIES = (("Amsterdam", "10"), ("Amstelveen", "11"), ("Zaandam", "15"), ("Diemen", "11"))
LETTERS = "ABCDEGHJKLMNPRSTVWXZ"

#: LOINC code, display, Dutch label, UCUM unit, low, high, decimals.
VITALS = (
    ("8480-6", "Systolic blood pressure", "systolische bloeddruk", "mm[Hg]", 105, 165, 0),
    ("8462-4", "Diastolic blood pressure", "diastolische bloeddruk", "mm[Hg]", 60, 100, 0),
    ("8867-4", "Heart rate", "pols", "/min", 55, 100, 0),
    ("29463-7", "Body weight", "gewicht", "kg", 50, 110, 1),
    ("8310-5", "Body temperature", "temperatuur", "Cel", 36.2, 38.4, 1),
)
LABS = (
    ("59260-0", "Hemoglobin [Moles/volume] in Blood", "Hb", "mmol/L", 6.5, 10.5, 1),
    ("14682-9", "Creatinine [Moles/volume] in Serum or Plasma", "kreatinine", "umol/L", 55, 160, 0),
    ("15074-8", "Glucose [Moles/volume] in Blood", "glucose", "mmol/L", 4.0, 11.0, 1),
    ("2823-3", "Potassium [Moles/volume] in Serum or Plasma", "kalium", "mmol/L", 3.5, 5.3, 1),
    ("2951-2", "Sodium [Moles/volume] in Serum or Plasma", "natrium", "mmol/L", 134, 146, 0),
    ("4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood", "HbA1c", "%", 5.0, 9.0, 1),
)
#: Per kind of organisation: (vitals low, high), (labs low, high), encounter SNOMED code, display.
VISIT_KINDS = {
    "hospital": ((2, 4), (2, 4), "185347001", "Encounter for problem (procedure)"),
    "gp": ((2, 3), (0, 2), "185349003", "Encounter for check up (procedure)"),
    "pharmacy": ((1, 2), (0, 0), "182836005", "Review of medication (procedure)"),
    "nursing-home": ((2, 4), (0, 1), "390906007", "Follow-up encounter (procedure)"),
}
REASONS = {
    "hospital": "Verwezen door de huisarts voor poliklinische beoordeling.",
    "gp": "Komt voor controle van bekende aandoeningen.",
    "pharmacy": "Medicatiebeoordeling op verzoek van de huisarts.",
    "nursing-home": "Periodieke evaluatie van het zorgplan.",
}
#: RxNorm code, display, Dutch dosage instruction.
MEDICATIONS = {
    "metformin": ("860975", "24 HR Metformin hydrochloride 500 MG Extended Release Oral Tablet",
                  "2x daags 1 tablet"),
    "amlodipine": ("197361", "Amlodipine 5 MG Oral Tablet", "1x daags 1 tablet"),
    "salbutamol": ("745679", "200 ACTUAT Albuterol 0.09 MG/ACTUAT Metered Dose Inhaler",
                   "zo nodig 1-2 pufjes"),
    "fluticasone": ("895994",
                    "120 ACTUAT Fluticasone propionate 0.044 MG/ACTUAT Metered Dose Inhaler",
                    "2x daags 2 pufjes"),
    "apixaban": ("1364445", "apixaban 5 MG Oral Tablet", "2x daags 1 tablet"),
    "sertraline": ("312940", "Sertraline 50 MG Oral Tablet", "1x daags 1 tablet"),
    "paracetamol": ("313782", "Acetaminophen 325 MG Oral Tablet",
                    "zo nodig max. 4x daags 2 tabletten"),
    "amoxicillin": ("308182", "Amoxicillin 250 MG Oral Capsule", "3x daags 1 capsule, 7 dagen"),
    "amoxiclav": ("562251", "Amoxicillin 250 MG / Clavulanate 125 MG Oral Tablet",
                  "3x daags 1 tablet, 5 dagen"),
}
#: Minimum age, SNOMED code, display, Dutch text, medication ("" when none).
CHRONIC = (
    (30, "44054006", "Diabetes mellitus type 2 (disorder)", "diabetes mellitus type 2",
     "metformin"),
    (30, "38341003", "Hypertensive disorder, systemic arterial (disorder)", "hypertensie",
     "amlodipine"),
    (2, "195967001", "Asthma (disorder)", "astma", "salbutamol"),
    (45, "13645005", "Chronic obstructive lung disease (disorder)", "COPD", "fluticasone"),
    (50, "49436004", "Atrial fibrillation (disorder)", "atriumfibrilleren", "apixaban"),
    (14, "35489007", "Depressive disorder (disorder)", "depressie", "sertraline"),
    (45, "396275006", "Osteoarthritis (disorder)", "artrose", "paracetamol"),
    (65, "26929004", "Alzheimer's disease (disorder)", "ziekte van Alzheimer", ""),
)
#: SNOMED code, display, Dutch text, medication ("" when none).
ACUTE = (
    ("444814009", "Viral sinusitis (disorder)", "virale sinusitis", ""),
    ("10509002", "Acute bronchitis (disorder)", "acute bronchitis", "amoxicillin"),
    ("68566005", "Urinary tract infectious disease (disorder)", "urineweginfectie", "amoxiclav"),
)
VACCINES = (
    ("140", "Influenza, seasonal, injectable, preservative free"),
    ("208", "SARS-COV-2 (COVID-19) vaccine, mRNA, spike protein, LNP, preservative free, "
            "30 mcg/0.3mL dose"),
    ("33", "pneumococcal polysaccharide vaccine, 23 valent"),
    ("115", "Tdap"),
)
#: SNOMED code, display, category.
ALLERGIES = (
    ("91936005", "Allergy to penicillin", "medication"),
    ("300916003", "Latex allergy", "environment"),
    ("91935009", "Allergy to peanuts", "food"),
    ("418689008", "Allergy to grass pollen", "environment"),
)
# fmt: on
